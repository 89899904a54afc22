from helexa.neuron.cli import main

main()
