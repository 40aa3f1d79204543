"""appc: image names (:mod:`fetchd.appc.names`), meta discovery (:mod:`fetchd.appc.discovery`),
and ACIs (:mod:`fetchd.appc.aci`, :mod:`fetchd.appc.manifest`).

Nothing is imported here: the CLI imports only what a command needs.
"""
