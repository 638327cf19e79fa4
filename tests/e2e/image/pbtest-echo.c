/* pbtest-echo: answers every TCP connection or UDP datagram with the address it came from.
 * Built statically into the test image (busybox has no UDP server and cannot show peers, and
 * its nc cannot stream in bulk).
 * usage: pbtest-echo tcp|udp PORT [PORT...]   (one process per port, IPv4 and IPv6)
 *        pbtest-echo sink PORT                (accept TCP connections, discard what comes)
 *        pbtest-echo send IP PORT MEGABYTES   (stream zeros; prints seconds and MB/s) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void peer_text(struct sockaddr_in6 *peer, char *out, size_t len) {
    if (IN6_IS_ADDR_V4MAPPED(&peer->sin6_addr))
        inet_ntop(AF_INET, &peer->sin6_addr.s6_addr[12], out, len);
    else
        inet_ntop(AF_INET6, &peer->sin6_addr, out, len);
    strncat(out, "\n", len - strlen(out) - 1);
}

static void serve(int udp, int port) {
    int s = socket(AF_INET6, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    int off = 0, on = 1;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in6 addr = {0};
    addr.sin6_family = AF_INET6;
    addr.sin6_port = htons(port);
    addr.sin6_addr = in6addr_any;
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); exit(1); }
    if (!udp && listen(s, 64) < 0) { perror("listen"); exit(1); }
    for (;;) {
        struct sockaddr_in6 peer;
        socklen_t plen = sizeof peer;
        char text[INET6_ADDRSTRLEN + 2] = "", buf[2048];
        if (udp) {
            if (recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen) < 0) continue;
            peer_text(&peer, text, sizeof text);
            sendto(s, text, strlen(text), 0, (struct sockaddr *)&peer, plen);
        } else {
            int c = accept(s, (struct sockaddr *)&peer, &plen);
            if (c < 0) continue;
            peer_text(&peer, text, sizeof text);
            if (write(c, text, strlen(text)) < 0) perror("write");
            close(c);
        }
    }
}

static void sink(int port) {
    int s = socket(AF_INET6, SOCK_STREAM, 0), off = 0, on = 1;
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in6 addr = {0};
    addr.sin6_family = AF_INET6;
    addr.sin6_port = htons(port);
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 8) < 0) {
        perror("sink"); exit(1);
    }
    static char buf[1 << 16];
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        while (read(c, buf, sizeof buf) > 0) {}
        close(c);
    }
}

static int send_zeros(const char *ip, int port, long megabytes) {
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 1; }
    static char buf[1 << 16];
    long total = megabytes * 1000000L, sent = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (sent < total) {
        long chunk = total - sent < (long)sizeof buf ? total - sent : (long)sizeof buf;
        ssize_t n = write(s, buf, chunk);
        if (n <= 0) { perror("write"); return 1; }
        sent += n;
    }
    shutdown(s, SHUT_WR);
    while (read(s, buf, sizeof buf) > 0) {}
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.6f seconds %.1f MB/s\n", secs, sent / secs / 1e6);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "sink") == 0) sink(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "send") == 0)
        return send_zeros(argv[2], atoi(argv[3]), atol(argv[4]));
    if (argc < 3) { fprintf(stderr, "usage: %s tcp|udp PORT...\n", argv[0]); return 2; }
    int udp = strcmp(argv[1], "udp") == 0;
    for (int i = 3; i < argc; i++)
        if (fork() == 0) serve(udp, atoi(argv[i]));
    serve(udp, atoi(argv[2]));
    return 0;
}
