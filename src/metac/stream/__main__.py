from metac.stream.service import main

main()
