"""The console scripts: each parses its arguments, calls the library, prints and exits."""
