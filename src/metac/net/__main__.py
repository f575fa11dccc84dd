from metac.net.service import main

main()
