"""The benchmark harness behind ``scripts/bench`` (issue 5).

It only measures: every case drives our proxy and the anchor (Debian's
``skopeo experimental-image-proxy``) with the same client code from
``proxy/client.py``, so that only the server differs between two rows.
"""
