from metac.vm.service import main

main()
