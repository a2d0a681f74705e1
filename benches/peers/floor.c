/*
 * The floor of benches/compare.sh: what the kernel alone costs for one proxied exchange.
 *
 * A single-threaded epoll relay that does the system calls a reverse proxy cannot avoid and
 * nothing else: accept the client, read its request, write it to a pooled keep-alive upstream
 * connection ("/api/v2/" to v2, the rest to v1), read the response, write it to the client, and
 * close the client when it asked for "Connection: close". Like rollout-proxy, it has the kernel
 * defer each accept until the request has arrived (TCP_DEFER_ACCEPT), reads it straight away,
 * watches a client with epoll only once it has to wait for a next request, and turns Nagle's
 * algorithm off only before a connection's second write. It parses nothing beyond the request
 * line's path and that one header, and it trusts each message to arrive in one read, which holds
 * for the benchmark's small requests and responses on loopback and for nothing else: it is a
 * measuring stick, not a proxy.
 *
 * Usage: floor LISTEN_PORT V1_PORT V2_PORT   (all on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 16384
#define MAX_FD 65536

enum kind { FREE, CLIENT, UPSTREAM };

struct conn {
  enum kind kind;
  int peer;        /* the client's upstream while a request is out, or the upstream's client */
  int pool;        /* an upstream's pool: 0 is v1, 1 is v2 */
  int close_after; /* a client that sent "Connection: close" */
  int watched;     /* in the epoll set */
  int writes;      /* responses written to a client */
};

static struct conn conns[MAX_FD];
static int idle[2][1024];
static int idle_count[2];
static int upstream_port[2];
static char buf[BUF];
static int ep;

static void die(const char *what) {
  perror(what);
  exit(1);
}

static void watch(int fd) {
  struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
  conns[fd].watched = 1;
}

static void drop(int fd) {
  int peer = conns[fd].peer;
  if (peer >= 0 && conns[peer].peer == fd) conns[peer].peer = -1;
  if (conns[fd].kind == UPSTREAM) /* an idle one the upstream closed leaves the pool */
    for (int i = 0, pool = conns[fd].pool; i < idle_count[pool]; i++)
      if (idle[pool][i] == fd) idle[pool][i] = idle[pool][--idle_count[pool]];
  conns[fd] = (struct conn){.kind = FREE, .peer = -1};
  close(fd); /* close removes it from the epoll set */
}

static int upstream(int pool) {
  if (idle_count[pool] > 0) return idle[pool][--idle_count[pool]];
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(upstream_port[pool])};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  conns[fd] = (struct conn){.kind = UPSTREAM, .pool = pool, .peer = -1};
  watch(fd);
  return fd;
}

static void from_client(int fd) {
  ssize_t n = read(fd, buf, BUF);
  if (n <= 0) {
    if (n < 0 && errno == EAGAIN) {
      if (!conns[fd].watched) watch(fd);
      return;
    }
    drop(fd);
    return;
  }
  /* "GET /api/v2/..." : the path starts after the first space. */
  const char *space = memchr(buf, ' ', (size_t)n);
  int pool = space && (size_t)(buf + n - space) > 9 && memcmp(space + 1, "/api/v2/", 8) == 0;
  /* A request asking to close: keep the upstream connection, close the client afterwards. */
  const char *close_header = memmem(buf, (size_t)n, "\r\nConnection: close\r\n", 21);
  if (close_header) {
    size_t at = (size_t)(close_header - buf) + 2, len = 19;
    memmove(buf + at, buf + at + len, (size_t)n - at - len);
    n -= (ssize_t)len;
  }
  conns[fd].close_after = close_header != NULL;
  int up = upstream(pool);
  conns[up].peer = fd;
  conns[fd].peer = up;
  if (write(up, buf, (size_t)n) != n) die("write upstream");
}

static void from_upstream(int fd) {
  ssize_t n = read(fd, buf, BUF);
  int client = conns[fd].peer;
  if (n <= 0) {
    if (n < 0 && errno == EAGAIN) return;
    if (client >= 0) drop(client);
    drop(fd);
    return;
  }
  if (client >= 0) {
    if (conns[client].writes++ == 1) {
      int one = 1;
      setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    conns[client].peer = -1;
    int written = write(client, buf, (size_t)n) == n; /* a client gone meanwhile fails it */
    if (!written || conns[client].close_after)
      drop(client);
    else if (!conns[client].watched)
      watch(client);
  }
  conns[fd].peer = -1;
  int pool = conns[fd].pool;
  if (idle_count[pool] < 1024)
    idle[pool][idle_count[pool]++] = fd;
  else
    drop(fd);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: floor LISTEN_PORT V1_PORT V2_PORT\n");
    return 2;
  }
  upstream_port[0] = atoi(argv[2]);
  upstream_port[1] = atoi(argv[3]);
  signal(SIGPIPE, SIG_IGN); /* a client that went away fails its write and is dropped */
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
  if (listen(listener, 4096) < 0) die("listen");
  setsockopt(listener, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof one);
  ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev) < 0) die("epoll_ctl");
  struct epoll_event events[256];
  for (;;) {
    int ready = epoll_wait(ep, events, 256, -1);
    for (int i = 0; i < ready; i++) {
      int fd = events[i].data.fd;
      if (fd == listener) {
        int client;
        while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          if (client >= MAX_FD) {
            close(client);
            continue;
          }
          conns[client] = (struct conn){.kind = CLIENT, .peer = -1};
          from_client(client);
        }
      } else if (conns[fd].kind == CLIENT) {
        from_client(fd);
      } else if (conns[fd].kind == UPSTREAM) {
        from_upstream(fd);
      }
    }
  }
}
