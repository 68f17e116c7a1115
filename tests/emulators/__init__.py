"""Emulators of real parts at register or frame level, written from their datasheets, with
fault injection, for tests that have no hardware."""
