"""What knows FHIR bodies: links pointed back at the sidecar (``links``, ``links_stream``) and
the scanner that finds them in Bundles fast (``bundle_scan``).
"""
