from rose.cli import entry

entry()
