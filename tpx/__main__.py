from tpx.cli import main

main()
