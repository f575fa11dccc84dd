from metac.compute.service import main

main()
