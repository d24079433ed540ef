"""Load fhir-sidecar into your own mitmproxy:

    mitmdump -s addons/fhir_sidecar.py --set sidecar_config=config/example.yaml

The addons set the listeners (forward proxy and per-connection reverse ports) from the config.
None of the embedded master's speed tweaks is applied to your mitmproxy.
"""

from sidecar.proxy.addon import sidecar_addons

addons = sidecar_addons().chain
