"""Generated gRPC and protobuf code for the public API (do not edit; see proto/)."""
