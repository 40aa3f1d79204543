"""Trust: which keys may sign which names, and checking their signatures.

- :mod:`fetchd.trust.openpgp`: the one module that uses the OpenPGP library (pysequoia):
  reading keys, the strict key policy, signature packets, verification (detached in a
  child process: :mod:`fetchd.trust.verify`; inline in process for small messages).
- :mod:`fetchd.trust.keystore`: rkt's on-disk keystore (root.d, prefix.d by path
  component, vendor keys masked by empty local files) plus OCI publishers (oci.d).
- :mod:`fetchd.trust.command`: ``fetchd trust`` (rkt trust's words and flags).
- :mod:`fetchd.trust.oci`: signatures of OCI images by trusted publishers.
"""
