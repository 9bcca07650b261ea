#!/bin/sh
# /init of the test guest (busybox sh, PID 1 in the initramfs).
#
# It loads the virtio modules listed in /etc/vne/modules, gives eth0 an
# address, runs the job from the kernel command line, prints results on the
# console and powers off. Kernel command line parameters, all optional:
#   vne.job=STEP[,STEP...]  steps, run in order (default: ping):
#       ping[:COUNT[:INTERVAL_S]]   busybox ping to the peer (default 20, 0.2)
#       udp:COUNT:SIZE[:RATE_PPS]   udpgen to peer:port (default rate: max)
#       sleep:SECONDS
#   vne.peer=IPV4      host side of the link (default 192.0.2.1)
#   vne.addr=IPV4/LEN  guest address of eth0 (default 192.0.2.2/24)
#   vne.port=PORT      UDP destination port (default 9000)
#   vne.guard=SECONDS  quiet time around each udp step (default 0.5)
#
# Console lines that the host parses (tests/guest/qemu.py), one per event:
#   VNE-BOOT uptime_s=S               init started
#   VNE-LINK uptime_s=S               eth0 is up with its address
#   VNE-RESULT kind=ping ...          ping summary as key=value pairs
#   VNE-MARK udp-begin / udp-end      brackets of one udp step, after and
#                                     before a guard sleep, so that host-side
#                                     traces can be cut to the step
#   VNE-UDPGEN sent=... pps=...       the generator's own result line
#   VNE-STATS ...                     eth0 counters from sysfs at the end
#   VNE-VIRTIO-ERROR <dmesg line>     a driver error found in dmesg
#   VNE-ERROR <text>                  a step of this script failed
#   VNE-DONE status=ok|failed         last line before poweroff

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
status=ok

fail() {
	echo "VNE-ERROR $*"
	status=failed
}

uptime_s() {
	cut -d' ' -f1 /proc/uptime
}

# Print the value of kernel command line parameter $1, or $2 if it is absent.
cmdline_value() {
	value=$2
	for word in $(cat /proc/cmdline); do
		case "$word" in
		"$1"=*) value=${word#*=} ;;
		esac
	done
	echo "$value"
}

finish() {
	for counter in tx_packets rx_packets tx_dropped rx_dropped tx_errors; do
		file=/sys/class/net/eth0/statistics/$counter
		[ -r "$file" ] && stats="$stats $counter=$(cat "$file")"
	done
	echo "VNE-STATS$stats"
	# The patterns are the virtio_ring and virtio_net messages for a device
	# that broke the ring protocol, plus the TX watchdog and kernel warnings.
	dmesg | grep -E 'virtio|eth0' |
		grep -E 'is not a head|out of range|broken|timed out|unexpected' |
		sed 's/^/VNE-VIRTIO-ERROR /'
	dmesg | grep -E 'BUG:|WARNING:|Oops' | sed 's/^/VNE-VIRTIO-ERROR /'
	echo "VNE-DONE status=$status"
	sync
	poweroff -f
	sleep 10
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VNE-BOOT uptime_s=$(uptime_s)"

peer=$(cmdline_value vne.peer 192.0.2.1)
addr=$(cmdline_value vne.addr 192.0.2.2/24)
port=$(cmdline_value vne.port 9000)
guard=$(cmdline_value vne.guard 0.5)
job=$(cmdline_value vne.job ping)

# No IPv6: router and neighbour solicitations would add TX packets and kicks
# that the measurements would count as part of the job.
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null

while read -r module; do
	insmod "$module" || fail "insmod $module failed"
done </etc/vne/modules

waited=0
while [ ! -e /sys/class/net/eth0 ] && [ $waited -lt 50 ]; do
	sleep 0.1
	waited=$((waited + 1))
done
if [ ! -e /sys/class/net/eth0 ]; then
	fail "eth0 not found after loading the virtio modules"
	finish
fi
ip link set lo up
ip addr add "$addr" dev eth0 || fail "ip addr add $addr dev eth0 failed"
ip link set eth0 up || fail "ip link set eth0 up failed"
echo "VNE-LINK uptime_s=$(uptime_s)"

# One echo request fills the neighbour cache, so the first udp datagrams are
# not held back or dropped while ARP resolves the peer.
ping -c 1 -W 5 "$peer" >/dev/null 2>&1 || fail "peer $peer did not answer ARP or ping"

run_ping() {
	count=${1:-20}
	interval=${2:-0.2}
	ping -q -c "$count" -i "$interval" -W 5 "$peer" >/tmp/ping.out 2>&1
	ping_exit=$?
	# busybox prints "N packets transmitted, M packets received, ..." and
	# "round-trip min/avg/max = A/B/C ms".
	awk -v peer="$peer" -v code="$ping_exit" '
		/packets transmitted/ { tx = $1; rx = $4 }
		/round-trip/ { split($4, rtt, "/") }
		END {
			line = "VNE-RESULT kind=ping peer=" peer " exit=" code
			line = line " transmitted=" (tx == "" ? 0 : tx)
			line = line " received=" (rx == "" ? 0 : rx)
			if (rtt[2] != "")
				line = line " rtt_min_ms=" rtt[1] " rtt_avg_ms=" rtt[2] " rtt_max_ms=" rtt[3]
			print line
		}' /tmp/ping.out
	[ "$ping_exit" -eq 0 ] || fail "ping $peer exited with $ping_exit"
}

run_udp() {
	if [ -z "$1" ] || [ -z "$2" ]; then
		fail "udp step needs udp:COUNT:SIZE[:RATE_PPS]"
		return
	fi
	sleep "$guard"
	echo "VNE-MARK udp-begin"
	sleep "$guard"
	/bin/udpgen "$peer" "$port" "$1" "$2" ${3:+"$3"} || fail "udpgen exited with $?"
	sleep "$guard"
	echo "VNE-MARK udp-end"
	sleep "$guard"
}

for step in $(echo "$job" | tr ',' ' '); do
	kind=${step%%:*}
	args=$(echo "${step#"$kind"}" | tr ':' ' ')
	case "$kind" in
	ping) run_ping $args ;;
	udp) run_udp $args ;;
	sleep) sleep $args ;;
	*) fail "unknown step '$step' in vne.job=$job" ;;
	esac
done
finish
