from metac.persistence.service import main

main()
