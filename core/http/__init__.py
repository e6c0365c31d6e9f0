"""HTTP pieces both daemons' APIs share: the JSON error shape, request validation, the access log."""
