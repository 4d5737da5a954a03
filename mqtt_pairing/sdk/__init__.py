"""The Python SDK for runners and apps (docs/sdk.md)."""
