#!/bin/sh
# Run a command in a private network and mount namespace: loopback only, and Docker Hub's names pinned to a
# dead loopback address, so a client that falls back from a broken mirror cannot leave the machine.
set -eu
exec unshare --net --mount --propagation private --fork -- sh -eu -c '
  ip link set lo up
  tmp=$(mktemp -d)
  cp /etc/hosts "$tmp/hosts"
  echo "127.0.0.9 registry-1.docker.io index.docker.io auth.docker.io production.cloudflare.docker.com docker.io" >> "$tmp/hosts"
  # a registry name that is not an address (the engine caches what it read of /etc/hosts, so it is here from the start)
  echo "127.0.0.1 plain.registry.test" >> "$tmp/hosts"
  echo "nameserver 127.0.0.1" > "$tmp/resolv.conf"
  mount --bind "$tmp/hosts" /etc/hosts
  mount --bind "$tmp/resolv.conf" /etc/resolv.conf
  exec "$@"' isolated "$@"
