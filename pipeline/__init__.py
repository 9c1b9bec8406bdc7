"""bms: the BookMyShow Azure Stream Analytics job, rebuilt as a portable Apache Beam pipeline."""
