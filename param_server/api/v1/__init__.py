"""paramserver.v1: generated messages and service stubs (do not edit; see proto/)."""
