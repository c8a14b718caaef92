"""SubFit's recipes (YAML), installed as package data so ``strategy=<name>`` finds them."""
