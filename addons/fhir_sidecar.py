"""Load fhir-sidecar into your own mitmproxy:

    mitmdump -s addons/fhir_sidecar.py --set sidecar_config=config/example.yaml

The addon sets the listeners (forward proxy and per-connection reverse ports) from the config.
"""

from sidecar.proxy.addon import FhirSidecar

_sidecar = FhirSidecar()
addons = [_sidecar, _sidecar.upstream_tls, _sidecar.client_limits, _sidecar.read_timeout]
