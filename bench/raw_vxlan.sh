#!/bin/bash
# The kernel's own VXLAN ceiling on this machine, for the cross-host stream ratio of
# docs/benchmarks.md: two "hosts" (network namespaces) on a veth underlay bridge (in a
# namespace of its own), each with a bridge, a VXLAN device and a "container" namespace on a
# veth; no Docker, no pybridge, no firewall (BRNF=1: bridged frames through iptables with one
# conntrack rule, as on a Docker host). Prints host-to-host and container-to-container iperf3
# streams, 4 s each, interleaved. Traffic stays between the namespaces it creates.
#     bench/raw_vxlan.sh [ROUNDS]
set -e
P=rvx$$
ns() { ip netns exec "$@"; }
cleanup() { for n in ul h1 h2 c1 c2; do ip netns del $P-$n 2>/dev/null || true; done; }
trap cleanup EXIT
for n in ul h1 h2 c1 c2; do ip netns add $P-$n; ns $P-$n ip link set lo up; done
ns $P-ul ip link add ul type bridge; ns $P-ul ip link set ul address 02:cb:00:71:00:fd up
for i in 1 2; do
  ip link add h$i-u netns $P-h$i type veth peer name u$i netns $P-ul
  ns $P-ul ip link set u$i master ul up
  ns $P-h$i ip addr add 192.168.251.$i/24 dev h$i-u; ns $P-h$i ip link set h$i-u up
  ns $P-h$i ip link add br0 type bridge; ns $P-h$i ip link set br0 up
  o=$((3-i))
  ns $P-h$i ip link add vx type vxlan id 42 local 192.168.251.$i dstport 4799 nolearning
  ns $P-h$i ip link set vx mtu 1450 master br0 up
  ns $P-h$i bridge fdb append 00:00:00:00:00:00 dev vx dst 192.168.251.$o
  ip link add c$i netns $P-c$i type veth peer name p$i netns $P-h$i
  ns $P-h$i ip link set p$i mtu 1450 master br0 up
  ns $P-c$i ip link set c$i mtu 1450 up; ns $P-c$i ip addr add 10.251.0.$i/24 dev c$i
done
if [ "$BRNF" = 1 ]; then for i in 1 2; do ns $P-h$i sysctl -qw net.bridge.bridge-nf-call-iptables=1; ns $P-h$i iptables -A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT; done; fi
ns $P-c1 ping -c2 -q 10.251.0.2 >/dev/null; ns $P-h1 ping -c2 -q 192.168.251.2 >/dev/null
run() { # $1 client ns, $2 server ns, $3 server addr
  ns $2 iperf3 -s -1 -p 5301 >/dev/null 2>&1 & sleep 0.3
  ns $1 iperf3 -c $3 -p 5301 -t 4 -J | python3 -c 'import json,sys;print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))'
  wait
}
for _ in $(seq "${1:-4}"); do
  echo "host $(run $P-h1 $P-h2 192.168.251.2) container $(run $P-c1 $P-c2 10.251.0.2)"
done
