from farworker.cli import main

main()
