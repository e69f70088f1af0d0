"""Student models (``build.build_student`` by registered kind), their base class and config, and
the export of a distilled student to its own ecosystem."""
