import sys

from helexa.neuron.worker.child import main

main(sys.argv[1:])
