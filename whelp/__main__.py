from whelp.cli import app

app(prog_name="whelp")
