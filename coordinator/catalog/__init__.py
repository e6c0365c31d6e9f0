"""The catalog: service images registered with their Dependency Manifests, the input of deployments.

`model` holds the records and the catalog as a pure index, `validation` the checks a registration
passes before anything is stored, `service` the operations the API calls. See docs/deployments.md.
"""
