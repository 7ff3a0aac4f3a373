"""Offline stand-in for rules_proto: forwards to the native rule."""

def proto_library(**kwargs):
    native.proto_library(**kwargs)
