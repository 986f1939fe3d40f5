#!/bin/sh
# The real test node's CNI plugin (installed as both the default network and containerd's loopback): it creates
# nothing. The node's runc wrapper (runc-hostnet.py) puts every container into the host's network namespace, so
# the pod's own namespace stays unused; this plugin only tells containerd the address the pod is reached at,
# 127.0.0.1. No interface, no route, no address is ever added anywhere.
case "$CNI_COMMAND" in
  ADD)
    cat >/dev/null
    if [ "$CNI_IFNAME" = lo ]; then
      printf '{"cniVersion":"0.4.0","interfaces":[{"name":"lo","sandbox":"%s"}],"ips":[]}\n' "$CNI_NETNS"
    else
      printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"127.0.0.1/8","interface":0}]}\n' "$CNI_IFNAME" "$CNI_NETNS"
    fi ;;
  DEL|CHECK) cat >/dev/null ;;
  VERSION) printf '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}\n' ;;
  *) cat >/dev/null; exit 0 ;;
esac
