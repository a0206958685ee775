from autopar.cli.main import main

main()
