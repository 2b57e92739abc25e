# Listen addresses as the daemon and nginx take them, and as a client on this host dials them.
{ lib }:

rec {
  wildcards = [
    "0.0.0.0"
    "::"
    ""
  ];

  isLoopback =
    host:
    lib.elem host [
      "127.0.0.1"
      "::1"
      "localhost"
    ]
    || lib.hasPrefix "127." host;

  # An IPv6 literal needs brackets in a URL and in nginx's `host:port`.
  bracketed = host: if lib.hasInfix ":" host then "[${host}]" else host;

  # What a client on this machine dials: a wildcard bind is reachable on loopback.
  dialHost = host: if lib.elem host wildcards then "127.0.0.1" else bracketed host;

  # Whether two listeners on the same port would collide.
  overlap =
    a: b: a == b || lib.elem a wildcards || lib.elem b wildcards || (isLoopback a && isLoopback b);
}
