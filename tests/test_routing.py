from sidecar.routing import Router, Upstream, is_path_prefix


def router() -> Router:
    return Router([
        ("root", Upstream.from_url("https://fhir.example.org")),
        ("r4", Upstream.from_url("https://FHIR.example.org/fhir")),
        ("r4-other", Upstream.from_url("https://fhir.example.org/fhir/other")),
        ("epic", Upstream.from_url("https://epic.example.com:8443/api/FHIR/R4/")),
    ])


def test_longest_base_path_wins_on_segment_boundary() -> None:
    r = router()
    assert r.forward("fhir.example.org", "/fhir/Patient/1").connection == "r4"
    assert r.forward("fhir.example.org", "/fhir/other/Patient").connection == "r4-other"
    assert r.forward("fhir.example.org", "/fhir-other/Patient").connection == "root"
    assert r.forward("fhir.example.org", "/fhir").connection == "r4"


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
