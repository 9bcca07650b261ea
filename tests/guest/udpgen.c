/*
 * udpgen: send COUNT UDP datagrams of SIZE payload bytes to ADDRESS:PORT.
 *
 * Usage: udpgen ADDRESS PORT COUNT SIZE [RATE]
 *
 * Without RATE (or with RATE 0) it sends as fast as the socket accepts them.
 * With RATE it paces the datagrams to RATE per second on CLOCK_MONOTONIC.
 * A datagram that send() rejects with ENOBUFS or EAGAIN (qdisc or socket
 * buffer full) is sent again, and so is one rejected with ECONNREFUSED (the
 * socket reporting an earlier ICMP port unreachable, before this datagram
 * was queued). So exactly COUNT datagrams leave the socket. Both kinds of
 * retry are counted, not logged.
 *
 * On success it prints one line to stdout and exits 0:
 *   VNE-UDPGEN sent=COUNT size=SIZE elapsed_ns=NS pps=PPS retries=R refused=F
 * On failure it prints "udpgen: ..." to stderr and exits 1 (bad arguments: 2).
 *
 * Built with `gcc -static -O2` for the guest initramfs, which has no libc.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD 65507 /* largest UDP payload over IPv4 */

static uint64_t monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

static int parse_number(const char *text, const char *name, unsigned long max,
			unsigned long *value)
{
	char *end;

	errno = 0;
	*value = strtoul(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || *value > max) {
		fprintf(stderr, "udpgen: invalid %s '%s' (expected 0..%lu)\n",
			name, text, max);
		return -1;
	}
	return 0;
}

/* Sleep until the monotonic clock reaches deadline_ns. */
static void wait_until(uint64_t deadline_ns)
{
	struct timespec deadline = {
		.tv_sec = (time_t)(deadline_ns / 1000000000ull),
		.tv_nsec = (long)(deadline_ns % 1000000000ull),
	};

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline,
			       NULL) == EINTR)
		;
}

int main(int argc, char **argv)
{
	unsigned long port, count, size, rate = 0;
	unsigned long sent = 0, retries = 0, refused = 0;
	struct sockaddr_in peer;
	static char payload[MAX_PAYLOAD];
	uint64_t start_ns, elapsed_ns;
	double pps;
	int fd;

	if (argc != 5 && argc != 6) {
		fprintf(stderr,
			"usage: udpgen ADDRESS PORT COUNT SIZE [RATE]\n");
		return 2;
	}
	memset(&peer, 0, sizeof(peer));
	peer.sin_family = AF_INET;
	if (inet_pton(AF_INET, argv[1], &peer.sin_addr) != 1) {
		fprintf(stderr, "udpgen: invalid IPv4 address '%s'\n", argv[1]);
		return 2;
	}
	if (parse_number(argv[2], "port", 65535, &port) ||
	    parse_number(argv[3], "count", 4000000000ul, &count) ||
	    parse_number(argv[4], "size", MAX_PAYLOAD, &size) ||
	    (argc == 6 && parse_number(argv[5], "rate", 100000000ul, &rate)))
		return 2;
	peer.sin_port = htons((uint16_t)port);

	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		fprintf(stderr, "udpgen: socket failed: %s\n", strerror(errno));
		return 1;
	}
	/* connect() fixes the route and neighbour once instead of per sendto. */
	if (connect(fd, (struct sockaddr *)&peer, sizeof(peer)) < 0) {
		fprintf(stderr, "udpgen: connect to %s:%lu failed: %s\n",
			argv[1], port, strerror(errno));
		return 1;
	}

	start_ns = monotonic_ns();
	while (sent < count) {
		if (rate != 0)
			wait_until(start_ns + sent * 1000000000ull / rate);
		/* The first 4 payload bytes carry the sequence number. */
		if (size >= 4) {
			uint32_t sequence = htonl((uint32_t)sent);

			memcpy(payload, &sequence, sizeof(sequence));
		}
		if (send(fd, payload, size, 0) < 0) {
			if (errno == ENOBUFS || errno == EAGAIN ||
			    errno == EINTR) {
				retries++;
				continue;
			}
			if (errno == ECONNREFUSED) {
				refused++;
				continue;
			}
			fprintf(stderr,
				"udpgen: send of datagram %lu failed: %s\n",
				sent, strerror(errno));
			return 1;
		}
		sent++;
	}
	elapsed_ns = monotonic_ns() - start_ns;
	pps = elapsed_ns ? (double)sent * 1e9 / (double)elapsed_ns : 0.0;
	printf("VNE-UDPGEN sent=%lu size=%lu elapsed_ns=%llu pps=%.0f "
	       "retries=%lu refused=%lu\n",
	       sent, size, (unsigned long long)elapsed_ns, pps, retries,
	       refused);
	close(fd);
	return 0;
}
