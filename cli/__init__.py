"""Thin command line: parse, call the library, print."""
