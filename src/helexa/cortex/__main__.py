from helexa.cortex.cli import main

main()
