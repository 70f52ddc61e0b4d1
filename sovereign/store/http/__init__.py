"""Resumable HTTP(S) downloads into partial files: the transport policy, one stream, parallel byte ranges."""
