from longtail.cli import main

main()
