"""SQL, one module per table family. The rules that call these live in directory/*.py."""
