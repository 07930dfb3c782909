from dao.cli import main

main()
