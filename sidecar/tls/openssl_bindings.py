"""The private pyOpenSSL bindings the sidecar needs, fenced in this one file.

pyOpenSSL has no public API for hostname verification or for TLS 1.3 key-share groups. Each
use of ``SSL._lib`` / ``Connection._ssl`` is kept in one function here, and
``tests/test_tls_policy.py`` fails loudly if a binding changes.
"""

from __future__ import annotations

import functools
import ipaddress

from OpenSSL import SSL

# OpenSSL's default groups (3.5 and later), most preferred first. By default it sends key
# shares for the first two, a large post-quantum hybrid and X25519.
_DEFAULT_GROUPS = ("X25519MLKEM768", "X25519", "secp256r1", "X448", "secp384r1", "secp521r1",
                   "ffdhe2048", "ffdhe3072")


_key_share_syntax_known = True  # cleared when OpenSSL refuses the 3.5 group-list syntax


def offer_key_share_first(conn: SSL.Connection, group: str) -> bool:
    """Send a TLS 1.3 key share only for ``group``, still offering every default group.

    A resumed handshake still runs the key exchange, and by default the client computes two
    key shares of which the server uses one: for a server that chose X25519 last time, the
    unused post-quantum share is most of the client's handshake cost and of its ClientHello.
    This is a hint, not a restriction: a server that prefers another offered group asks for
    it with a HelloRetryRequest, so nothing is downgraded (the choice being hinted came from
    an authenticated handshake). Returns False, changing nothing, for a group not in the
    default list or an OpenSSL older than 3.5.

    pyOpenSSL has no public API for groups, hence the private binding, kept in this function
    so that ``tests/test_tls_policy.py`` fails loudly if it changes. cryptography binds
    ``SSL_set1_curves_list`` from 47.0 on: that is the floor in ``pyproject.toml``, which CI's
    Python 3.12 run installs exactly (``.ci/oldest-deps.txt``).
    """
    global _key_share_syntax_known
    groups = _groups_sharing_first(group.lower())
    if groups is None or not _key_share_syntax_known:
        return False
    lib = SSL._lib
    accepted = lib.SSL_set1_curves_list(conn._ssl, groups)
    if accepted != 1:  # pragma: no cover - only an OpenSSL < 3.5 refuses; CI's is newer
        # OpenSSL before 3.5 knows neither the "?"/"*" markers nor the hybrid group, and its
        # default already sends a single key share: nothing to improve there.
        lib.ERR_clear_error()
        _key_share_syntax_known = False
        return False
    return True


@functools.cache
def _groups_sharing_first(group: str) -> bytes | None:
    """The default group list with a key share for ``group`` only (built once per group)."""
    first = next((g for g in _DEFAULT_GROUPS if g.lower() == group), None)
    if first is None:
        return None
    return ":".join([f"?*{first}", *(f"?{g}" for g in _DEFAULT_GROUPS if g != first)]).encode()


def enable_hostname_verification(conn: SSL.Connection, name: str) -> None:
    """Make OpenSSL check the peer certificate's name during the handshake.

    pyOpenSSL has no public API for this; mitmproxy itself uses the same private bindings.
    Kept in this one function so that ``tests/test_tls_policy.py`` fails loudly if they change.
    """
    lib = SSL._lib
    param = lib.SSL_get0_param(conn._ssl)
    # No partial wildcards, and never fall back to the subject CN (browsers dropped it too).
    lib.X509_VERIFY_PARAM_set_hostflags(param, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
                                        lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT)
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        packed = address.packed
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    else:
        encoded = name.encode("idna")
        ok = lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
    if ok != 1:
        raise RuntimeError(f"OpenSSL refused to enable hostname verification for {name!r}")
