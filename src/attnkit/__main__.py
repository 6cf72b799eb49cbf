from attnkit.cli.main import main

main()
