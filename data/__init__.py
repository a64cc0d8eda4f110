"""Shared DataModules and dataset readers (imports neither tasks nor the CLI)."""
