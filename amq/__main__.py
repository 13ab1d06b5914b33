from amq.cli import main

main()
