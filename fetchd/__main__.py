from fetchd.cli import main

main()
