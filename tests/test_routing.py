from sidecar.request.routing import Router, Upstream, is_path_prefix


def connection(r: Router, host: str, path: str) -> str:
    """The connection a request is forwarded to; a test that expects one fails on None."""
    route = r.forward(host, path)
    assert route is not None, (host, path)
    return route.connection


def router() -> Router:
    return Router([
        ("root", Upstream.from_url("https://fhir.example.org")),
        ("r4", Upstream.from_url("https://FHIR.example.org/fhir")),
        ("r4-other", Upstream.from_url("https://fhir.example.org/fhir/other")),
        ("epic", Upstream.from_url("https://epic.example.com:8443/api/FHIR/R4/")),
    ])


def test_longest_base_path_wins_on_segment_boundary() -> None:
    r = router()
    assert connection(r, "fhir.example.org", "/fhir/Patient/1") == "r4"
    assert connection(r, "fhir.example.org", "/fhir/other/Patient") == "r4-other"
    assert connection(r, "fhir.example.org", "/fhir-other/Patient") == "root"
    assert connection(r, "fhir.example.org", "/fhir") == "r4"


def test_hostname_is_case_insensitive_and_port_compared() -> None:
    r = router()
    route = r.forward("EPIC.example.com", "/api/FHIR/R4/Patient?name=x", port=8443)
    assert route is not None
    assert route.connection == "epic"
    assert route.upstream_path == "/api/FHIR/R4/Patient?name=x"
    assert r.forward("epic.example.com", "/api/FHIR/R4/Patient") is None  # no port given


def test_unknown_host_or_path_matches_nothing() -> None:
    r = router()
    assert r.forward("evil.example.net", "/fhir/Patient") is None
    assert r.forward("epic.example.com", "/api/FHIR/R4x/Patient") is None
    # The query string never influences the match.
    assert r.forward("epic.example.com", "/other?x=/api/FHIR/R4/") is None


def test_reverse_applies_base_path_once() -> None:
    up = Upstream.from_url("https://epic.example.com/api/FHIR/R4")
    assert Router.reverse("e", up, "/Patient/1?x=1").upstream_path == "/api/FHIR/R4/Patient/1?x=1"
    assert Router.reverse("e", up, "/api/FHIR/R4/Patient").upstream_path == "/api/FHIR/R4/Patient"


def test_segment_prefix() -> None:
    assert is_path_prefix("", "/anything")
    assert is_path_prefix("/fhir", "/fhir/x")
    assert not is_path_prefix("/fhir", "/fhirx")


def test_upstream_host_header_and_default_ports() -> None:
    assert Upstream.from_url("https://a.example/x").host_header == "a.example"
    assert Upstream.from_url("https://a.example:8443/x").host_header == "a.example:8443"
    assert Upstream.from_url("http://a.example/x").port == 80


def test_a_default_port_written_out_matches_a_url_without_one() -> None:
    # port_key: the scheme's default port, written or not, is "no port".
    r = router()
    for scheme, port in (("http", 80), ("https", 443)):
        route = r.forward("fhir.example.org", "/fhir/Patient", scheme=scheme, port=port)
        assert route is not None and route.connection == "r4", (scheme, port)
    # The default is the request's scheme's own: 443 on plain http is a port of its own.
    assert r.forward("fhir.example.org", "/fhir/Patient", scheme="http", port=443) is None
    assert r.forward("fhir.example.org", "/fhir/Patient", port=80) is not None  # scheme http
    assert r.forward("epic.example.com", "/api/FHIR/R4/x", scheme="https", port=443) is None


def test_a_host_written_with_a_trailing_dot_is_the_same_host() -> None:
    route = router().forward("FHIR.example.org.", "/fhir/Patient")
    assert route is not None and route.connection == "r4"


def test_the_query_string_is_kept_but_never_part_of_the_base_path_match() -> None:
    r = router()
    route = r.forward("epic.example.com", "/api/FHIR/R4?_count=1", port=8443)
    assert route is not None
    assert (route.connection, route.upstream_path) == ("epic", "/api/FHIR/R4?_count=1")


def test_reverse_adds_a_missing_leading_slash_and_ignores_the_query_when_matching() -> None:
    up = Upstream.from_url("https://epic.example.com/api/FHIR/R4")
    assert Router.reverse("e", up, "Patient").upstream_path == "/api/FHIR/R4/Patient"
    assert Router.reverse("e", up, "/api/FHIR/R4?x=/y").upstream_path == "/api/FHIR/R4?x=/y"
    route = Router.reverse("e", up, "/api/FHIR/R4x")
    assert (route.connection, route.upstream_path) == ("e", "/api/FHIR/R4/api/FHIR/R4x")
    root = Upstream.from_url("https://epic.example.com/")
    assert root.base_path == ""
    assert Router.reverse("e", root, "/Patient?x=1").upstream_path == "/Patient?x=1"


def test_upstream_parts_host_header_and_base_url() -> None:
    up = Upstream.from_url("https://A.Example:8443/base/")
    assert (up.scheme, up.host, up.port, up.base_path) == ("https", "a.example", 8443, "/base")
    assert up.port_key == 8443
    assert up.base_url == "https://a.example:8443/base"
    plain = Upstream.from_url("http://a.example/")
    assert (plain.port, plain.port_key, plain.host_header) == (80, None, "a.example")
    assert plain.base_url == "http://a.example"
    assert Upstream.from_url("https://a.example").port_key is None
    assert Upstream.from_url("http://a.example:443/").host_header == "a.example:443"
    assert Upstream.from_url("https://a.example:80/").host_header == "a.example:80"
    v6 = Upstream.from_url("https://[::1]:8443/r4")
    assert (v6.host, v6.host_header) == ("::1", "[::1]:8443")
    assert v6.base_url == "https://[::1]:8443/r4"
    assert Upstream.from_url("https://[::1]/").host_header == "[::1]"


def test_segment_prefix_is_exact_at_the_boundary() -> None:
    assert is_path_prefix("/fhir", "/fhir")
    assert not is_path_prefix("/fhir", "/fhi")
    assert not is_path_prefix("/fhir", "/")
    assert not is_path_prefix("/fhir/r4", "/fhir")


def test_a_longer_base_path_listed_first_still_wins_only_on_its_own_paths() -> None:
    # Built in the other order than router(): the sort, not the listing, picks the longest.
    r = Router([
        ("deep", Upstream.from_url("https://h.example/a/b")),
        ("mid", Upstream.from_url("https://h.example/a")),
        ("root", Upstream.from_url("https://h.example")),
    ])
    assert connection(r, "h.example", "/a/b/c") == "deep"
    assert connection(r, "h.example", "/a/bc") == "mid"
    assert connection(r, "h.example", "/x") == "root"
    r2 = Router(reversed([
        ("deep", Upstream.from_url("https://h.example/a/b")),
        ("mid", Upstream.from_url("https://h.example/a")),
    ]))
    assert connection(r2, "h.example", "/a/b/c") == "deep"
    assert connection(r2, "h.example", "/a/c") == "mid"


def test_only_the_first_question_mark_starts_the_query() -> None:
    route = router().forward("epic.example.com", "/api/FHIR/R4?a=?b", port=8443)
    assert route is not None and route.upstream_path == "/api/FHIR/R4?a=?b"
    up = Upstream.from_url("https://epic.example.com/api/FHIR/R4")
    route = Router.reverse("e", up, "/api/FHIR/R4?a=?b")
    assert (route.connection, route.upstream_path) == ("e", "/api/FHIR/R4?a=?b")


def test_only_slashes_are_cut_from_the_end_of_a_base_path() -> None:
    assert Upstream.from_url("https://h.example/R4X/").base_path == "/R4X"
    assert Upstream.from_url("https://h.example/R4.").base_path == "/R4."
