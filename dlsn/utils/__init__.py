"""Helpers of the entry scripts; import the submodule you need (nothing heavy is imported here).

* :mod:`dlsn.utils.config`: Hydra resolvers, the project root, cross-key config checks.
* :mod:`dlsn.utils.instantiate`: building the network, callbacks and loggers from config groups.
* :mod:`dlsn.utils.launcher`: launcher checks, rank-zero detection, the run-directory lock, exit codes.
* :mod:`dlsn.utils.files`: crash-safe (atomic) file writing.
* :mod:`dlsn.utils.rich_utils`: the config tree and results tables.
"""
