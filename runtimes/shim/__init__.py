"""The shim: the process that supervises containers so that they outlive the daemon.

``python -m berth.runtimes.shim start --dir DIR --socket PATH`` starts one (it detaches and prints its
socket's address once it serves); :mod:`.manager` is the daemon's side.
"""
