/*
 * keyguard: keep the Triton admin key out of /proc/<pid>/cmdline.
 *
 * Triton reads its restricted-API key only from its command line, and every local user can
 * read any process's command line. The platform therefore starts tritonserver with a
 * placeholder where the key goes and this library in LD_PRELOAD, with the key in the
 * environment variable RECSYS_TRITON_ARGV_SECRET (a process's environment is readable only by
 * its own user). Before main() runs, the constructor below points every argv entry that holds
 * the placeholder at a heap copy with the key filled in, so main() parses the real key while
 * the bytes the kernel shows in /proc/<pid>/cmdline keep the placeholder. It then wipes the
 * variable's value in place and removes it (and RECSYS_TRITON_ADMIN_KEY, should the server
 * have inherited the clients' variable), and removes LD_PRELOAD, so that the python backend
 * stubs (which run model code from the repository) inherit none of them.
 *
 * If the variable is missing, argv is left alone and the server fails to authorise anyone,
 * which is the safe direction.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#define SECRET_ENV "RECSYS_TRITON_ARGV_SECRET"
#define CLIENT_KEY_ENV "RECSYS_TRITON_ADMIN_KEY"
#define PLACEHOLDER "@RECSYS_TRITON_ADMIN_KEY@"

static char *with_secret(const char *arg, const char *secret) {
    const char *at = strstr(arg, PLACEHOLDER);
    size_t head = (size_t)(at - arg);
    size_t tail = strlen(at + strlen(PLACEHOLDER));
    char *out = malloc(head + strlen(secret) + tail + 1);
    if (out == NULL) {
        abort();
    }
    memcpy(out, arg, head);
    memcpy(out + head, secret, strlen(secret));
    memcpy(out + head + strlen(secret), at + strlen(PLACEHOLDER), tail + 1);
    return out;
}

static void keyguard_init(int argc, char **argv, char **envp) {
    (void)envp;
    char *secret = getenv(SECRET_ENV);
    if (secret == NULL || secret[0] == '\0') {
        return;
    }
    char *kept = strdup(secret);
    if (kept == NULL) {
        abort();
    }
    for (int i = 1; i < argc; i++) {
        if (argv[i] != NULL && strstr(argv[i], PLACEHOLDER) != NULL) {
            argv[i] = with_secret(argv[i], kept);
        }
    }
    memset(secret, 0, strlen(secret));
    unsetenv(SECRET_ENV);
    /* A key the server inherited under its usual name is of no use to it either. */
    char *inherited = getenv(CLIENT_KEY_ENV);
    if (inherited != NULL) {
        memset(inherited, 0, strlen(inherited));
        unsetenv(CLIENT_KEY_ENV);
    }
    unsetenv("LD_PRELOAD");
}

__attribute__((section(".init_array"), used)) static void (*keyguard_init_entry)(
    int, char **, char **) = keyguard_init;
