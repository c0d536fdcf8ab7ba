/*
 * berth-launch: the compiled form of bin/berth's launcher (as Mercurial's chg is of hg).
 *
 * It hands a `berth` command to the warm command server (client/cliserver.py, protocol "berth-cli-1")
 * and exits with the command's status; it needs no interpreter start-up, which is most of what a
 * command costs otherwise. When there is no usable server it does what bin/berth's inline Python does:
 * it starts one for the next command and runs this one with Python itself.
 *
 *   berth-launch PYTHON [ARGS...]     (bin/berth runs it when it is installed beside it)
 *   berth [ARGS...]                   (built with -DBERTH_PYTHON='"/path/to/python3"': the launcher
 *                                      itself, one exec fewer per command; scripts/setup.sh installs it)
 *
 * Wire format (client/cliserver.py): u32 big-endian length, then NUL-separated fields
 * "berth-cli-1", cwd, argc, argv..., env... with descriptors 0, 1, 2 attached (SCM_RIGHTS); then
 * "S" + u8 signal for each forwarded signal. The answer is "X" + i32 big-endian status, or "R" (run
 * it yourself).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static const char *python;
static char **command_args;
static int command_argc;
static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int conn = -1;
static volatile sig_atomic_t forwarded;

/* Run the command with Python (starting a server for the next commands first when asked). */
static void direct(int start_server) {
    if (start_server) {
        char *server_argv[] = {(char *)python, "-m", "berth.client.cliserver", socket_path, NULL};
        pid_t pid;
        posix_spawn(&pid, python, NULL, NULL, server_argv, environ);
    }
    char **argv = calloc((size_t)command_argc + 4, sizeof(char *));
    if (argv == NULL) {
        perror("berth");
        exit(255);
    }
    argv[0] = (char *)python;
    argv[1] = "-c";
    argv[2] = "import sys; from berth.client.cli import main; sys.exit(main())";
    for (int i = 0; i < command_argc; i++)
        argv[3 + i] = command_args[i];
    execv(python, argv);
    execvp(python, argv);
    fprintf(stderr, "berth: cannot run %s: %s\n", python, strerror(errno));
    exit(255);
}

/* 1: a directory only this user can enter; 0: something else; -1: missing. */
static int private_directory(const char *path) {
    struct stat info;
    if (lstat(path, &info) != 0)
        return -1;
    return S_ISDIR(info.st_mode) && (info.st_mode & 07777) == 0700 && info.st_uid == getuid();
}

static void forward(int signum) {
    if (signum != SIGWINCH)
        forwarded = signum;
    unsigned char message[2] = {'S', (unsigned char)signum};
    int saved = errno;
    if (write(conn, message, 2) < 0) {
        /* the server is gone: the reply loop finds out */
    }
    errno = saved;
}

struct buffer {
    char *data;
    size_t length, capacity;
};

static void append(struct buffer *b, const char *text, size_t length, int separator) {
    size_t need = b->length + length + (separator ? 1 : 0);
    if (need > b->capacity) {
        b->capacity = need * 2 + 4096;
        b->data = realloc(b->data, b->capacity);
        if (b->data == NULL) {
            perror("berth");
            exit(255);
        }
    }
    if (separator)
        b->data[b->length++] = '\0';
    memcpy(b->data + b->length, text, length);
    b->length += length;
}

static int send_request(void) {
    struct buffer body = {NULL, 0, 0};
    char number[32];
    char *cwd = getcwd(NULL, 0);
    if (cwd == NULL)
        return -1;
    append(&body, "berth-cli-1", 11, 0);
    append(&body, cwd, strlen(cwd), 1);
    free(cwd);
    snprintf(number, sizeof number, "%d", command_argc);
    append(&body, number, strlen(number), 1);
    for (int i = 0; i < command_argc; i++)
        append(&body, command_args[i], strlen(command_args[i]), 1);
    for (char **entry = environ; *entry != NULL; entry++)
        append(&body, *entry, strlen(*entry), 1);

    unsigned char header[4] = {(unsigned char)(body.length >> 24), (unsigned char)(body.length >> 16),
                               (unsigned char)(body.length >> 8), (unsigned char)body.length};
    struct iovec parts[2] = {{header, 4}, {body.data, body.length}};
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct msghdr message = {.msg_iov = parts, .msg_iovlen = 2, .msg_control = control,
                             .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&message);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);

    ssize_t sent = sendmsg(conn, &message, MSG_NOSIGNAL);
    if (sent < 0) {
        free(body.data);
        return -1;
    }
    size_t total = body.length + 4, done = (size_t)sent;
    while (done < total) { /* the rest of a large environment, without the descriptors */
        const char *rest = done < 4 ? (const char *)header + done : body.data + (done - 4);
        size_t size = done < 4 ? 4 - done : total - done;
        sent = send(conn, rest, size, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            free(body.data);
            return -1;
        }
        done += (size_t)sent;
    }
    free(body.data);
    return 0;
}

int main(int argc, char **argv) {
#ifdef BERTH_PYTHON
    python = BERTH_PYTHON;
    command_args = argv + 1;
    command_argc = argc - 1;
#else
    if (argc < 2) {
        fprintf(stderr, "usage: berth-launch PYTHON [ARGS...]\n");
        return 2;
    }
    python = argv[1];
    command_args = argv + 2;
    command_argc = argc - 2;
#endif

    const char *runtime = getenv("XDG_RUNTIME_DIR");
    char directory[sizeof socket_path];
    if (runtime != NULL && runtime[0] != '\0')
        snprintf(directory, sizeof directory, "%s/berth", runtime);
    else
        snprintf(directory, sizeof directory, "/tmp/berth-cli-%u", (unsigned)getuid());
    if ((size_t)snprintf(socket_path, sizeof socket_path, "%s/cli.sock", directory) >= sizeof socket_path)
        direct(0);

    const char *enabled = getenv("BERTH_CLI_SERVER");
    if (enabled != NULL && strcmp(enabled, "0") == 0)
        direct(0);
    int safe = private_directory(directory);
    if (safe != 1)
        direct(safe == -1);

    conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, socket_path, strlen(socket_path) + 1);
    if (conn < 0 || connect(conn, (struct sockaddr *)&address, sizeof address) != 0 || send_request() != 0) {
        if (conn >= 0)
            close(conn);
        direct(1);
    }

    struct sigaction action = {.sa_handler = forward};
    sigemptyset(&action.sa_mask);
    int signals[] = {SIGINT, SIGTERM, SIGHUP, SIGWINCH};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
        sigaction(signals[i], &action, NULL);

    unsigned char reply[5];
    size_t got = 0;
    while (got < 5) {
        ssize_t n = recv(conn, reply + got, 5 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (reply[0] == 'R')
            break;
    }
    if (got >= 1 && reply[0] == 'R') {
        close(conn);
        direct(1);
    }
    if (got != 5) {
        if (forwarded) { /* the command died of the signal we passed on: so do we */
            signal(forwarded, SIG_DFL);
            kill(getpid(), forwarded);
        }
        static const char lost[] = "berth: the command server ended without an exit status\n";
        if (write(2, lost, sizeof lost - 1) < 0) {
            /* nothing more to say */
        }
        return 255;
    }
    int32_t status = (int32_t)((uint32_t)reply[1] << 24 | (uint32_t)reply[2] << 16 | (uint32_t)reply[3] << 8 |
                               (uint32_t)reply[4]);
    return status >= 0 && status < 256 ? status : 1;
}
