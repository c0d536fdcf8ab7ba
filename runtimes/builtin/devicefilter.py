"""Device rules on cgroup v2: an eBPF program of type ``BPF_PROG_TYPE_CGROUP_DEVICE`` built from the rules.

cgroup v2 has no ``devices.allow`` file: the kernel asks a program attached to the cgroup, with a
``struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor}`` where ``access_type`` holds the
device type in its low 16 bits (block 1, char 2) and the access in its high 16 (mknod 1, read 2,
write 4). The program returns 1 to allow and 0 to deny.

The rules are tested from the last to the first, so a later rule wins, and a device no rule matches is
denied. An allow rule matches a request whose accesses are all among the rule's; a deny rule matches a
request that asks for any of its accesses. :func:`attach` replaces the programs already on the cgroup.
"""

from __future__ import annotations

import ctypes
import os
import struct

from berth.core.errdefs import FailedPrecondition
from berth.runtimes.builtin import linux

TYPE_CHECKING = False  # not typing's: importing typing costs every runtime call ~5 ms
if TYPE_CHECKING:
    from typing import Any

__all__ = ["attach", "program"]

_DEV_TYPES = {"b": 1, "c": 2}
_ACCESS = {"m": 1, "r": 2, "w": 4}

# eBPF opcodes (class | operation | source).
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_AND32_K = 0x54
_RSH32_K = 0x74
_MOV32_X = 0xBC
_MOV32_K = 0xB4
_JNE_K = 0x55
_JEQ_K = 0x15
_JSET_K = 0x45
_EXIT = 0x95

_R0, _R1, _R2, _R3, _R4, _R5 = range(6)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _access_bits(access: str) -> int:
    bits = 0
    for char in access:
        bits |= _ACCESS[char]
    return bits


def _rule_block(rule: dict[str, Any]) -> list[tuple[int, int, int, int | None]]:
    """One rule as instructions (code, dst, imm, None) and jumps to the next rule (code, dst, imm, -1)."""
    block: list[tuple[int, int, int, int | None]] = []
    if rule["type"] != "a":
        block.append((_JNE_K, _R2, _DEV_TYPES[rule["type"]], -1))
    bits = _access_bits(rule["access"])
    if bits != 7:
        if rule["allow"]:
            block.append((_JSET_K, _R3, 7 & ~bits, -1))  # asks for something the rule does not give
        else:
            block.append((_MOV32_X, _R1, _R3, None))
            block.append((_AND32_K, _R1, bits, None))
            block.append((_JEQ_K, _R1, 0, -1))  # asks for nothing the rule denies
    if rule["major"] != -1:
        block.append((_JNE_K, _R4, rule["major"], -1))
    if rule["minor"] != -1:
        block.append((_JNE_K, _R5, rule["minor"], -1))
    block.append((_MOV32_K, _R0, 1 if rule["allow"] else 0, None))
    block.append((_EXIT, 0, 0, None))
    return block


def program(rules: list[dict[str, Any]]) -> bytes:
    """The eBPF instructions for ``rules`` (normalised as :func:`cgroups.device_rules` returns them)."""
    code = [
        _insn(_LDX_W, _R2, _R1, 0), _insn(_AND32_K, _R2, imm=0xFFFF),
        _insn(_LDX_W, _R3, _R1, 0), _insn(_RSH32_K, _R3, imm=16),
        _insn(_LDX_W, _R4, _R1, 4), _insn(_LDX_W, _R5, _R1, 8),
    ]
    for rule in reversed(rules):
        block = _rule_block(rule)
        for i, (op, dst, imm, jump) in enumerate(block):
            if op == _MOV32_X:
                code.append(_insn(op, dst, imm))
            elif jump is None:
                code.append(_insn(op, dst, imm=imm))
            else:
                code.append(_insn(op, dst, off=len(block) - i - 1, imm=imm))
        if all(jump is None for *_, jump in block):
            return b"".join(code)  # matches every request: the kernel refuses unreachable code after it
    code.append(_insn(_MOV32_K, _R0, imm=0))
    code.append(_insn(_EXIT))
    return b"".join(code)


class _ProgLoad(ctypes.Structure):
    _fields_ = (("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32))


class _ProgAttach(ctypes.Structure):
    _fields_ = (("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32))


class _ProgQuery(ctypes.Structure):
    _fields_ = (("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32), ("query_flags", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32))


class _GetFdById(ctypes.Structure):
    _fields_ = (("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32))


_BPF_PROG_GET_FD_BY_ID = 13


def _load(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache")
    log = ctypes.create_string_buffer(65536)
    attr = _ProgLoad(prog_type=linux.BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                     insns=ctypes.addressof(insns), license=ctypes.addressof(license_), log_level=1,
                     log_size=len(log), log_buf=ctypes.addressof(log), prog_name=b"berth_dev",
                     expected_attach_type=linux.BPF_CGROUP_DEVICE)
    try:
        return linux.bpf(linux.BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()[-3:] or [exc.strerror or str(exc)]
        raise FailedPrecondition(
            f"cgroup v2: cannot load the device filter: {exc.strerror}: {' | '.join(detail)}") from None


def _attached(cgroup_fd: int) -> list[int]:
    ids = (ctypes.c_uint32 * 64)()
    query = _ProgQuery(target_fd=cgroup_fd, attach_type=linux.BPF_CGROUP_DEVICE, prog_ids=ctypes.addressof(ids),
                       prog_cnt=64)
    linux.bpf(linux.BPF_PROG_QUERY, query)
    return list(ids[: query.prog_cnt])


def attach(cgroup: str, rules: list[dict[str, Any]]) -> None:
    """Put the device filter for ``rules`` on the cgroup v2 directory ``cgroup``, replacing the ones there."""
    prog_fd = _load(program(rules))
    cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        old = _attached(cgroup_fd)
        linux.bpf(linux.BPF_PROG_ATTACH, _ProgAttach(target_fd=cgroup_fd, attach_bpf_fd=prog_fd,
                                                     attach_type=linux.BPF_CGROUP_DEVICE,
                                                     attach_flags=linux.BPF_F_ALLOW_MULTI))
        for prog_id in old:
            old_fd = linux.bpf(_BPF_PROG_GET_FD_BY_ID, _GetFdById(prog_id=prog_id))
            try:
                linux.bpf(linux.BPF_PROG_DETACH, _ProgAttach(target_fd=cgroup_fd, attach_bpf_fd=old_fd,
                                                             attach_type=linux.BPF_CGROUP_DEVICE))
            finally:
                os.close(old_fd)
    except OSError as exc:
        raise FailedPrecondition(f"cgroup v2: cannot attach the device filter to {cgroup}: {exc.strerror}") from None
    finally:
        os.close(cgroup_fd)
        os.close(prog_fd)
