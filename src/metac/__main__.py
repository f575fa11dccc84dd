from metac.cli.main import main

main()
